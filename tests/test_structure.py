"""Tests for sparsejax.structure: dependency groups of any traced model.

The reference is brute force on small random programs (tests/programs.py): for a unit u
of a group, zero the slices that produce it (its kernel columns, biases, normalization
parameters: 'writes' and 'owns') or the slices that read it (the next kernels' rows:
'reads'), and find by differentiation which parameters no longer matter; one of the two
must be exactly the other side of the group. A group missing a coupled slice (a GLU's
gate, a key's columns, a tied embedding's features) makes more parameters stop
mattering than it names; a group that couples units the program does not couple makes
fewer. The zoo's groups equal the hand-written channel spaces they replace.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import groups as groups_lib
from sparsejax.models import VGG, LeNet5, LeNet300100, ResNet18
from tests import programs

HYP = dict(
  deadline=None,
  max_examples=12,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _matters_fn(apply):
  """``(params, xs, rs) -> {path: bool array}``: parameters with a nonzero derivative
  of some r . apply(x) (one compiled program for every call)."""
  grad = jax.grad(lambda p, x, r: jnp.sum(apply(p, x) * r))

  @jax.jit
  def total(params, xs, rs):
    gs = jax.vmap(grad, in_axes=(None, 0, 0))(params, xs, rs)
    return jax.tree.map(lambda g: jnp.sum(jnp.abs(g), 0), gs)

  return lambda params, xs, rs: {k: np.asarray(v) > 0 for k, v in total(params, xs, rs).items()}


def _positions(group, u, roles) -> dict:
  """{path: bool array}: positions of the group's param slices of ``roles`` at unit u."""
  out = {}
  for s in group.slices_of():
    if s.role not in roles:
      continue
    shape = s.units.shape
    sel = s.units == u
    out.setdefault(s.path, []).append((s.axis, sel, shape))
  return out


def _mask_of(params, positions) -> dict:
  """{path: bool array shaped like the leaf}: True at the positions."""
  out = {}
  for path, entries in positions.items():
    m = np.zeros(np.shape(params[path]), bool)
    for axis, sel, _ in entries:
      idx = [slice(None)] * m.ndim
      idx[axis] = sel
      m[tuple(idx)] = True
    out[path] = m
  return out


def _inputs(x, seed, n=3):
  rng = np.random.default_rng(seed)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.asarray(rng.integers(0, 5, (n,) + x.shape), x.dtype)
  return jnp.asarray(rng.normal(size=(n,) + x.shape), jnp.float32)


def check_brute_force(apply, params, x, seed=0, units_per_group=2, groups=None):
  """Every removable group (or ``groups``) passes the zero-one-unit reference (module
  docstring)."""
  s = sparsejax.structure(apply, x, variables=params)
  xs = _inputs(x, seed)
  out_shape = jax.eval_shape(apply, params, x).shape
  rng = np.random.default_rng(seed + 1)
  rs = jnp.asarray(rng.normal(size=(len(xs),) + out_shape), jnp.float32)
  matters = _matters_fn(apply)
  base = matters(params, xs, rs)
  checked = 0
  for g in s.removable() if groups is None else groups:
    for u in sorted({0, g.size - 1})[:units_per_group]:
      produce = _mask_of(params, _positions(g, u, ("writes", "owns")))
      consume = _mask_of(params, _positions(g, u, ("reads",)))
      outcomes = []
      for zero, expect in ((produce, consume), (consume, produce)):
        if not zero:
          outcomes.append(False)
          continue
        zp = {k: jnp.where(zero[k], 0.0, v) if k in zero else v for k, v in params.items()}
        now = matters(zp, xs, rs)
        stopped = {k: base[k] & ~now[k] & ~zero.get(k, False) for k in params}
        want = {
          k: expect.get(k, np.zeros_like(base[k])) & base[k] & ~zero.get(k, False) for k in params
        }
        outcomes.append(all(np.array_equal(stopped[k], want[k]) for k in params))
      assert any(outcomes), (g.name, g.kind, u, s.table())
      checked += 1
  return s, checked


# --------------------------------------------------------------------- random programs


@settings(**HYP)
@given(blocks=programs.sequence_blocks(), seed=st.integers(0, 2**16))
def test_sequence_programs_against_brute_force(blocks, seed):
  apply, params, x = programs.build(blocks, seed=seed)
  s, checked = check_brute_force(apply, params, x, seed)
  assert checked >= 1


@settings(**HYP)
@given(
  blocks=programs.sequence_blocks(max_blocks=2), seed=st.integers(0, 2**16), tied=st.booleans()
)
def test_token_programs_with_tied_embeddings_against_brute_force(blocks, seed, tied):
  apply, params, x = programs.build(blocks, seed=seed, tokens=5, tied=tied)
  s, _ = check_brute_force(apply, params, x, seed)
  embed = [g for g in s.groups if any(sl.path == "embed" and sl.axis == 1 for sl in g.slices)]
  # The embedding's features are the stream's groups: every feature in exactly one. One
  # group, unless a concatenation writes the stream that a tied output layer reads back
  # through the table (then each part of the concatenation owns its columns).
  owner = np.zeros(params["embed"].shape[1], int)
  for g in embed:
    for sl in g.slices:
      if sl.path == "embed" and sl.axis == 1:
        owner += sl.units >= 0
  np.testing.assert_array_equal(owner, 1)
  if not (tied and any(b[0] == "concat" for b in blocks)):
    assert len(embed) == 1
  if tied:  # the output layer reads the features it writes
    assert all(g.removable for g in embed)


@settings(**HYP)
@given(blocks=programs.conv_blocks(), seed=st.integers(0, 2**16))
def test_conv_programs_against_brute_force(blocks, seed):
  apply, params, x = programs.build(blocks, seed=seed)
  s, checked = check_brute_force(apply, params, x, seed)
  assert checked >= 1


# --------------------------------------------------------------------- constructs


def groups_by_kind(s):
  out = {}
  for g in s.groups:
    out.setdefault(g.kind, []).append(g)
  return out


def test_attention_heads_and_grouped_query_attention():
  # 4 query heads over 2 key/value heads, head dim 3
  apply, params, x = programs.build([("attn", 4, 2, 3, False)], seed=1)
  s, _ = check_brute_force(apply, params, x, units_per_group=4)
  by = groups_by_kind(s)
  heads = sorted((g.size, g.name) for g in by["head"])
  assert [h[0] for h in heads] == [2, 2]  # kv heads (2), query heads per kv head (2)
  kv = next(g for g in by["head"] if any(sl.path == "b0/k" for sl in g.slices))
  assert {sl.path for sl in kv.slices} == {"b0/q", "b0/k", "b0/v", "b0/o", "b0/q_bias"}
  # a kv head owns the columns of its key and value head and of its query heads
  k = next(sl for sl in kv.slices if sl.path == "b0/k")
  np.testing.assert_array_equal(k.units, [0, 0, 0, 1, 1, 1])
  q = next(sl for sl in kv.slices if sl.path == "b0/q")
  np.testing.assert_array_equal(q.units, np.repeat([0, 1], 6))
  per = next(g for g in by["head"] if g is not kv)
  assert {sl.path for sl in per.slices} == {"b0/q", "b0/o", "b0/q_bias"}
  np.testing.assert_array_equal(
    next(sl for sl in per.slices if sl.path == "b0/o").units, np.tile(np.repeat([0, 1], 3), 2)
  )
  assert sorted(g.size for g in by["head_dim"]) == [3, 3]  # q.k features, v features


def test_fused_qkv_split_into_heads():
  apply, params, x = programs.build([("attn", 2, 2, 2, True)], seed=2)
  s, _ = check_brute_force(apply, params, x, units_per_group=2)
  (head,) = groups_by_kind(s)["head"]
  qkv = next(sl for sl in head.slices if sl.path == "b0/qkv")
  np.testing.assert_array_equal(qkv.units, [0, 0, 1, 1] * 3)


def test_glu_gate_and_up_are_one_group():
  apply, params, x = programs.build([("mlp", 3, True)], seed=3)
  s, _ = check_brute_force(apply, params, x, units_per_group=3)
  hidden = next(
    g for g in s.groups if any(sl.path == "b0/up" and sl.role == "writes" for sl in g.slices)
  )
  assert {(sl.path, sl.role) for sl in hidden.slices} == {
    ("b0/up", "writes"),
    ("b0/gate", "writes"),
    ("b0/down", "reads"),
  }
  assert hidden.kind == "neuron" and hidden.removable


def test_the_reference_catches_a_missing_slice_and_a_wrong_coupling():
  import dataclasses

  apply, params, x = programs.build([("mlp", 3, True)], seed=3)
  s = sparsejax.structure(apply, x, variables=params)
  hidden = next(g for g in s.removable() if "b0/gate" in {sl.path for sl in g.slices})
  missing = dataclasses.replace(
    hidden, slices=tuple(sl for sl in hidden.slices if sl.path != "b0/gate")
  )
  with pytest.raises(AssertionError):
    check_brute_force(apply, params, x, groups=[missing])
  wrong = dataclasses.replace(  # unit u's down-projection rows are another unit's
    hidden,
    slices=tuple(
      dataclasses.replace(sl, units=np.roll(sl.units, 1)) if sl.path == "b0/down" else sl
      for sl in hidden.slices
    ),
  )
  with pytest.raises(AssertionError):
    check_brute_force(apply, params, x, groups=[wrong])
  check_brute_force(apply, params, x, groups=[hidden, s["stream1"]])


def test_concatenation_offsets():
  apply, params, x = programs.build([("concat", 2, 3), ("dense", 2, "tanh")], seed=4)
  s, _ = check_brute_force(apply, params, x, units_per_group=3)
  by_path = {sl.path: g for g in s.groups for sl in g.slices if sl.role == "writes"}
  reads_a = next(sl for sl in by_path["b0/a"].slices if sl.path == "b1/kernel")
  reads_b = next(sl for sl in by_path["b0/b"].slices if sl.path == "b1/kernel")
  np.testing.assert_array_equal(reads_a.units, [0, 1, -1, -1, -1])
  np.testing.assert_array_equal(reads_b.units, [-1, -1, 0, 1, 2])


def test_grouped_and_depthwise_convolutions():
  apply, params, x = programs.build([("grouped", 2, 2, 3), ("depthwise", 2)], seed=5)
  s, _ = check_brute_force(apply, params, x, units_per_group=3)
  sizes = sorted(g.size for g in s.removable())
  # stem (4), conv groups (2: the pre conv's, the grouped conv's and the depthwise's
  # channels by group), per-group inputs (2), per-group outputs (3), depthwise multiplier (2)
  assert sizes == [2, 2, 2, 3, 4]


def test_residual_streams_are_one_group_named_stream():
  apply, params, x = programs.build([("mlp", 3, False), ("attn", 2, 2, 2, False)], seed=6)
  s, _ = check_brute_force(apply, params, x)
  stream = s["stream1"]
  writes = {sl.path for sl in stream.slices if sl.role == "writes"}
  assert writes == {"in_proj/kernel", "b0/down", "b1/o"}
  assert {sl.path for sl in stream.slices if sl.role == "owns"} >= {"b0/ln/scale", "b0/down_bias"}
  assert s.groups[0] is stream  # streams first


def test_flax_attention_and_tied_embeddings():
  import flax.linen as nn

  class Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      e = nn.Embed(11, 8)
      h = e(x)
      h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(h))
      h = h + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(h))))
      return e.attend(nn.LayerNorm()(h))

  m = Decoder()
  x = jnp.zeros((1, 5), jnp.int32)
  v = m.init(jax.random.key(0), x)
  s = sparsejax.structure(m, x, variables=v)
  kinds = {(g.kind, g.size, g.removable) for g in s.groups}
  assert ("head", 2, True) in kinds and ("neuron", 16, True) in kinds
  stream = s["stream1"]
  assert stream.size == 8 and stream.removable
  emb = [sl for sl in stream.slices if sl.path == "Embed_0/embedding"]
  assert [sl.axis for sl in emb] == [1]
  vocab = [g for g in s.groups if g.size == 11]
  assert vocab and not vocab[0].removable and "output" in vocab[0].reason
  text = s.table()
  assert "stream1" in text and "head" in text and "Embed_0/embedding[axis 1]" in text


# --------------------------------------------------------------------- bad input


def _dense_then(op):
  def apply(p, x):
    h = jnp.tanh(x @ p["a"])
    return op(h) @ p["b"]

  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)}
  params["b"] = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  return apply, params, jnp.ones((1, 2), jnp.float32)


@pytest.mark.parametrize(
  "op,why",
  [
    (lambda h: jnp.cumsum(h, -1), "cumulatively"),
    (lambda h: jnp.sort(h, -1), "reordered"),
    (lambda h: h[..., ::-1], "reversed"),
    (lambda h: h[..., ::2].repeat(2, -1), "stride"),
    (lambda h: h[:, jnp.array([1, 0, 2, 3, 5, 4])], "gather"),
    # [6] viewed as [3, 2] and as [2, 3]: no common refinement
    (
      lambda h: (h.reshape(1, 3, 2) + h.reshape(1, 2, 3).transpose(0, 2, 1)).reshape(1, 6),
      "boundar",
    ),
  ],
)
def test_a_mixed_axis_is_reported_not_removable(op, why):
  apply, params, x = _dense_then(op)
  s = sparsejax.structure(apply, x, variables=params)
  g = next(g for g in s.groups if any(sl.path == "a" and sl.role == "writes" for sl in g.slices))
  assert not g.removable, s.table()
  assert why in g.reason, g.reason
  assert g not in s.removable()
  # its units are never removed: masks for it are refused by compaction and pruning
  assert all(h.name != g.name for h in s.removable("neuron"))


def test_a_transpose_that_keeps_factors_is_followed():
  # [6] viewed as [2, 3] then transposed to [3, 2] and flattened: the units are permuted
  # consistently, a product of two dims; both stay removable
  apply, params, x = _dense_then(lambda h: h.reshape(1, 2, 3).transpose(0, 2, 1).reshape(1, 6))
  s = sparsejax.structure(apply, x, variables=params)
  assert [g.size for g in s.removable()] == [2, 3]
  check_brute_force(apply, params, x, units_per_group=3)


# --------------------------------------------------------------------- the zoo


def _zoo_spaces(model):
  """The channel spaces of the zoo as the hand-written tables of sparsejax.compact
  (before the structure issue) gave them: (name, size, writer layers, reader layers)."""
  if isinstance(model, LeNet300100):
    h = tuple(model.hidden)
    return [(f"dense_{i}", w, (f"dense_{i}",), (f"dense_{i + 1}",)) for i, w in enumerate(h)]
  if isinstance(model, LeNet5):
    c, h = tuple(model.channels), tuple(model.hidden)
    n = len(c)
    out = [
      (f"conv_{i}", w, (f"conv_{i}",), (f"conv_{i + 1}" if i + 1 < n else f"dense_{n}",))
      for i, w in enumerate(c)
    ]
    return out + [
      (f"dense_{n + j}", w, (f"dense_{n + j}",), (f"dense_{n + j + 1}",)) for j, w in enumerate(h)
    ]
  if isinstance(model, VGG):
    widths = [w for w in model.config if w != "M"]
    return [
      (
        f"conv_{i:02d}",
        w,
        (f"conv_{i:02d}",),
        (f"conv_{i + 1:02d}" if i + 1 < len(widths) else "dense",),
      )
      for i, w in enumerate(widths)
    ]
  widths = tuple(model.widths)
  inner = (
    tuple(model.inner) if model.inner is not None else tuple(w for w in widths for _ in range(2))
  )
  out = []
  for s, w in enumerate(widths, start=1):
    sites = ["stage0_conv"] if s == 1 else [f"stage{s}_block0/shortcut_conv"]
    sites += [f"stage{s}_block{b}/conv_2" for b in range(2)]
    readers = (["stage1_block0/conv_1"] if s == 1 else []) + [f"stage{s}_block1/conv_1"]
    readers += (
      [f"stage{s + 1}_block0/conv_1", f"stage{s + 1}_block0/shortcut_conv"]
      if s < len(widths)
      else ["stage5_dense"]
    )
    out.append((f"stream{s}", w, tuple(sites), tuple(readers)))
  for k, w in enumerate(inner):
    blk = f"stage{k // 2 + 1}_block{k % 2}"
    out.append((f"{blk}/conv_1", w, (f"{blk}/conv_1",), (f"{blk}/conv_2",)))
  return out


ZOO = [
  (LeNet300100(hidden=(24, 12)), (28, 28, 1)),
  (LeNet5(channels=(4, 6), hidden=(12, 8)), (28, 28, 1)),
  (VGG(config=(6, "M", 8, "M", 8, 10, "M"), num_classes=5), (16, 16, 3)),
  (ResNet18(num_classes=5, widths=(4, 6, 6, 8)), (16, 16, 3)),
  (ResNet18(num_classes=5, widths=(4, 6, 6, 8), inner=(3, 4, 5, 6, 2, 3, 4, 5)), (16, 16, 3)),
]


@pytest.mark.parametrize(
  "model,shape", ZOO, ids=lambda a: type(a).__name__ if not isinstance(a, tuple) else ""
)
def test_zoo_groups_are_the_hand_written_channel_spaces(model, shape):
  s = sparsejax.structure(model, shape)
  got = [
    (g.name, g.size, tuple(sorted(g.writers)), tuple(sorted(g.readers))) for g in s.removable()
  ]
  want = [(n, w, tuple(sorted(a)), tuple(sorted(b))) for n, w, a, b in _zoo_spaces(model)]
  assert got == want
  # a writer's variables: its kernel's last axis, its bias and its batch norm's
  # parameters and statistics
  for g in s.removable():
    owned = {sl.path for sl in g.slices if sl.role == "owns"}
    assert all(p.endswith(("bias", "scale", "mean", "var")) for p in owned)
    assert any(p.startswith("batch_stats/") for p in owned)


@functools.cache
def _resnet():
  model = ResNet18(num_classes=3, widths=(2, 2, 2, 2))
  return model, model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


def test_unit_masks_mask_writers_columns_and_readers_rows():
  model = LeNet300100(hidden=(3, 2))
  s = sparsejax.structure(model, (28, 28, 1))
  m = s.unit_masks({"dense_0": [0, 2]})
  k0, k1 = np.asarray(m["dense_0"]["kernel"]), np.asarray(m["dense_1"]["kernel"])
  assert k0[:, 1].sum() == 0 and k0[:, [0, 2]].all()
  assert k1[1].sum() == 0 and k1[[0, 2]].all() and np.asarray(m["dense_2"]["kernel"]).all()


def test_structure_is_cached_and_accepts_a_traced_model():
  model, v = _resnet()
  traced = sparsejax.trace(model, (8, 8, 3), variables=v)
  assert sparsejax.structure(traced) is sparsejax.structure(model, (8, 8, 3), variables=v)
  assert isinstance(sparsejax.structure(traced), groups_lib.Structure)
