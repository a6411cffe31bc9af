"""Sequence models in the connectivity transform (issue 25): embedding lookups, loops,
products of two input-dependent values (attention, gating), new primitives, SynFlow on
normalization and attention. Every rule is checked against an independent reference:
the same model unrolled, or the gradient support of the real function over many random
inputs in float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import effective, masks, scores

INT = jnp.int32


def ids(batch, length):
  return jax.ShapeDtypeStruct((batch, length), INT)


def counts(tree):
  return {p: int(np.asarray(m).sum()) for p, m in zip(masks.paths(tree), masks.mask_leaves(tree))}


# --------------------------------------------------------------------------- references


def gradient_support(fn, params, masks_tree, inputs, tol=1e-9):
  """Brute force: a weight is effective when it is kept and d outputs / d w is nonzero
  for some of ``inputs`` (float64 params and inputs; the kept weights random)."""
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    p64 = jax.tree.map(
      lambda w, m: w if m is None else jnp.where(m, w, 0.0),
      p64,
      masks_tree,
      is_leaf=lambda x: x is None,
    )
    support = jax.tree.map(lambda a: jnp.zeros(a.shape, bool), p64)
    for x in inputs:
      x = jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
      out_dim = int(np.prod(jax.eval_shape(lambda p: fn(p, x), p64).shape))
      for j in range(out_dim):
        g = jax.grad(lambda p: fn(p, x).reshape(-1)[j])(p64)
        support = jax.tree.map(lambda s, gi: s | (jnp.abs(gi) > tol), support, g)
    return jax.tree.map(
      lambda s, m: None if m is None else np.asarray(s & m),
      support,
      masks_tree,
      is_leaf=lambda x: x is None,
    )


def assert_same(a, b):
  for pa, x, y in zip(masks.paths(a), masks.mask_leaves(a), masks.mask_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=pa)


# --------------------------------------------------------------------------- lookups


class EmbedLM(nn.Module):
  vocab: int = 11
  width: int = 8
  tied: bool = False
  one_hot: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width, name="embed")
    if self.one_hot:
      x = jax.nn.one_hot(tokens, self.vocab) @ embed.embedding
    else:
      x = embed(tokens)
    x = nn.gelu(nn.Dense(self.width, name="hidden")(x))
    return embed.attend(x) if self.tied else nn.Dense(self.vocab, name="out")(x)


def test_an_embedding_table_is_a_prunable_linear_op_over_the_vocabulary():
  model = EmbedLM()
  v = model.init(jax.random.key(0), jnp.zeros((1, 5), INT))
  traced = sparsejax.trace(model, ids(1, 5), variables=v)
  assert traced.prunable_paths == ["embed/embedding", "hidden/kernel", "out/kernel"]
  m = traced.ones()
  m["embed"]["embedding"] = m["embed"]["embedding"].at[:, :3].set(False)  # 3 dims dead
  m["embed"]["embedding"] = m["embed"]["embedding"].at[4].set(False)  # one token row
  conn = effective.connectivity(traced, m)
  eff = conn.masks
  # every kept row of a live dimension is reachable (any token can occur) and feeds on
  assert counts(eff)["embed/embedding"] == 10 * 5
  # the hidden layer's rows that read a dead embedding dimension are ineffective
  np.testing.assert_array_equal(
    np.asarray(eff["hidden"]["kernel"]).any(1), [0, 0, 0, 1, 1, 1, 1, 1]
  )
  assert conn.active_units["embed"] == 5 * 5  # positions x live dimensions
  # the one-hot form of the same lookup gives the same effective masks
  oh = EmbedLM(one_hot=True)
  assert_same(effective.effective_masks(oh, m, ids(1, 5), variables=v), eff)


def test_tied_embeddings_are_one_leaf_with_one_mask_used_twice():
  model = EmbedLM(tied=True)
  v = model.init(jax.random.key(0), jnp.zeros((1, 5), INT))
  traced = sparsejax.trace(model, ids(1, 5), variables=v)
  assert traced.prunable_paths == ["embed/embedding", "hidden/kernel"]
  m = traced.ones()
  m["embed"]["embedding"] = m["embed"]["embedding"].at[:, 0].set(False)
  eff = effective.effective_masks(traced, m)
  assert counts(eff)["embed/embedding"] == 11 * 7
  # a token row whose every entry is pruned is no output logit any more: the output
  # side of the tie kills nothing else (rows are read by both uses)
  m["embed"]["embedding"] = m["embed"]["embedding"].at[2].set(False)
  assert counts(effective.effective_masks(traced, m))["embed/embedding"] == 10 * 7


def test_integer_inputs_and_their_errors():
  model = EmbedLM()
  v = model.init(jax.random.key(0), jnp.zeros((1, 5), INT))
  example = jnp.zeros((2, 5), INT)  # an example array works as well as a shape struct
  assert sparsejax.trace(model, example, variables=v).input.shape == (2, 5)
  with pytest.raises(ValueError, match=r"takes an integer example.*ShapeDtypeStruct"):
    sparsejax.trace(model, (5,), variables=v)


class Pick(nn.Module):
  """``values[argmax(selector(x))]``: activations read at positions that depend on the
  input (sst2's roll by each sequence's length, top-k routing)."""

  @nn.compact
  def __call__(self, x):
    v = nn.Dense(4, name="values")(x)
    g = nn.Dense(4, name="selector")(x)
    return jnp.take_along_axis(v, jnp.argmax(g, -1, keepdims=True), -1)


def test_a_read_of_activations_at_input_positions_reaches_every_position_and_its_index():
  model = Pick()
  v = model.init(jax.random.key(0), jnp.zeros((1, 3)))
  traced = sparsejax.trace(model, (3,), variables=v)
  full = traced.ones()
  # any position may be read: every value unit is effective, and so is the selector,
  # which changes the output only through the index (no gradient flows there)
  assert_same(effective.connectivity(traced, full).masks, full)
  m = traced.ones()
  m["values"]["kernel"] = jnp.zeros_like(m["values"]["kernel"])
  eff = effective.connectivity(traced, m).masks
  # the output is still values' bias at a position chosen by the input
  assert counts(eff)["selector/kernel"] == 3 * 4
  m["values"]["kernel"] = m["values"]["kernel"].at[:, 1].set(True)
  m["selector"]["kernel"] = m["selector"]["kernel"].at[0].set(False)
  eff = effective.connectivity(traced, m).masks
  assert_same(eff, m)  # every kept weight is on an input-output path


# --------------------------------------------------------------------------- loops


class Cell(nn.Module):
  @nn.compact
  def __call__(self, c, x):
    h = jnp.tanh(nn.Dense(6, name="h")(c) + nn.Dense(6, name="x")(x))
    return h, h


class ScanRNN(nn.Module):
  @nn.compact
  def __call__(self, xs):
    cell = nn.scan(
      Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
    )(name="cell")
    c, ys = cell(jnp.zeros((xs.shape[0], 6)), xs)
    return nn.Dense(2, name="out")(c + ys[:, 0])


class UnrolledRNN(nn.Module):
  @nn.compact
  def __call__(self, xs):
    cell, c, first = Cell(name="cell"), jnp.zeros((xs.shape[0], 6)), None
    for t in range(xs.shape[1]):
      c, y = cell(c, xs[:, t])
      first = y if first is None else first
    return nn.Dense(2, name="out")(c + first)


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(5, name="dense")(h)), None


class ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = stack(name="layers")(nn.Dense(5, name="inp")(x), None)
    return nn.Dense(2, name="out")(h)


def fori_mlp(params, x):
  def body(i, h):
    return jnp.tanh(h @ params["w"][i])

  return jax.lax.fori_loop(0, 3, body, x @ params["w0"])


def python_mlp(params, x):
  h = x @ params["w0"]
  for i in range(3):
    h = jnp.tanh(h @ params["w"][i])
  return h


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.5, 0.8, 0.9]))
def test_loops_equal_their_unrolled_programs(seed, sparsity):
  key = jax.random.key(seed)
  x = jnp.ones((1, 4, 3))
  scanned, unrolled = ScanRNN(), UnrolledRNN()
  v = scanned.init(jax.random.key(0), x)
  m = masks.random(key, sparsejax.trace(scanned, x, variables=v).ones(), sparsity)
  a = effective.connectivity(scanned, m, x, variables=v)
  b = effective.connectivity(unrolled, m, x, variables=v)
  assert_same(a.masks, b.masks)
  assert_same(a.potential, b.potential)
  # fori_loop with constant bounds against a Python loop, one stacked weight leaf
  params = {"w0": jnp.ones((3, 5)), "w": jnp.ones((3, 5, 5))}
  mf = masks.random(key, masks.ones(params, ["w0", "w"]), sparsity)
  assert_same(
    effective.effective_masks(fori_mlp, mf, (3,), params=params),
    effective.effective_masks(python_mlp, mf, (3,), params=params),
  )


def test_a_scanned_layer_stack_is_one_stacked_weight_per_layer_kind():
  model = ScanStack()
  v = model.init(jax.random.key(0), jnp.ones((1, 3)))
  traced = sparsejax.trace(model, (3,), variables=v)
  assert traced.prunable_paths == ["inp/kernel", "layers/dense/kernel", "out/kernel"]
  m = traced.ones()
  m["layers"]["dense"]["kernel"] = m["layers"]["dense"]["kernel"].at[1].set(False)  # layer 2
  eff = effective.effective_masks(traced, m)
  assert counts(eff) == {"inp/kernel": 0, "layers/dense/kernel": 0, "out/kernel": 0}


def test_a_loop_whose_trip_count_depends_on_the_input_is_refused():
  def until_small(params, x):
    h = x @ params["w"]
    return jax.lax.while_loop(lambda h: jnp.sum(h) > 1.0, lambda h: h / 2, h)

  with pytest.raises(
    ValueError,
    match=r"'while' at .*test_sequence_connectivity.py:\d+.*"
    r"trip count depends on the input",
  ):
    sparsejax.trace(until_small, (3,), params={"w": jnp.ones((3, 3))})


def test_tile():
  def tiled(params, x):
    return jnp.tile(x @ params["w"], (1, 2)) @ params["v"]

  params = {"w": jnp.ones((3, 2)), "v": jnp.ones((4, 1))}
  m = masks.ones(params, ["w", "v"])
  m["v"] = jnp.asarray([[True], [False], [False], [True]])
  eff = effective.effective_masks(tiled, m, (3,), params=params)
  np.testing.assert_array_equal(np.asarray(eff["w"]), np.ones((3, 2), bool))  # both copies


# --------------------------------------------------------------------------- products


class Attention(nn.Module):
  heads: int = 2
  width: int = 8
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
    h = nn.MultiHeadDotProductAttention(
      num_heads=self.heads, qkv_features=self.width, use_bias=False, name="attn"
    )(x, mask=mask)
    return nn.Dense(3, use_bias=False, name="out")(h)


class GLU(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(6, use_bias=False, name="gate")(x)
    up = nn.Dense(6, use_bias=False, name="up")(x)
    return nn.Dense(3, use_bias=False, name="down")(nn.gelu(gate) * up)


def test_a_dead_value_projection_makes_its_heads_query_key_and_output_ineffective():
  model = Attention(heads=1, width=4)
  x = jnp.ones((1, 3, 4))
  v = model.init(jax.random.key(0), x)
  traced = sparsejax.trace(model, x, variables=v)
  m = traced.ones()
  m["attn"]["value"]["kernel"] = jnp.zeros_like(m["attn"]["value"]["kernel"])
  c = counts(effective.effective_masks(traced, m))
  assert c["attn/query/kernel"] == c["attn/key/kernel"] == c["attn/out/kernel"] == 0
  assert c["out/kernel"] == 0


def test_a_dead_glu_gate_kills_its_up_projection():
  model = GLU()
  v = model.init(jax.random.key(0), jnp.ones((1, 4)))
  traced = sparsejax.trace(model, (4,), variables=v)
  m = traced.ones()
  m["gate"]["kernel"] = m["gate"]["kernel"].at[:, 2].set(False)  # unit 2 of the gate dead
  eff = effective.effective_masks(traced, m)
  assert not np.asarray(eff["up"]["kernel"])[:, 2].any()
  assert not np.asarray(eff["down"]["kernel"])[2].any()
  assert counts(eff)["up/kernel"] == 4 * 5


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  kind=st.sampled_from(["attention", "causal", "glu"]),
  sparsity=st.sampled_from([0.3, 0.6, 0.85]),
  dead=st.integers(0, 2),
)
def test_products_equal_the_gradient_support_of_the_function(seed, kind, sparsity, dead):
  """Random attention / GLU programs, random masks (some whole heads or units dead):
  the effective masks are exactly the weights whose gradient is nonzero for some input
  (float64, biases zero)."""
  model = {"attention": Attention(), "causal": Attention(causal=True), "glu": GLU()}[kind]
  shape = (1, 3, 8) if kind != "glu" else (1, 4)
  v = model.init(jax.random.key(seed), jnp.ones(shape))
  traced = sparsejax.trace(model, jnp.ones(shape), variables=v)
  m = masks.random(jax.random.key(seed + 1), traced.ones(), sparsity)
  first = masks.paths(m)[dead]
  leaf = dict(zip(masks.paths(m), masks.mask_leaves(m)))[first]
  zero = leaf.at[..., 0].set(False) if leaf.ndim > 1 else leaf
  m = jax.tree_util.tree_map_with_path(
    lambda p, a: zero if a is not None and masks.path_str(p) == first else a,
    m,
    is_leaf=lambda x: x is None,
  )
  inputs = [jax.random.normal(jax.random.key(seed + 7 + i), shape) for i in range(3)]
  fn = lambda p, x: model.apply({"params": p}, x)
  want = gradient_support(fn, v["params"], m, inputs)
  assert_same(effective.effective_masks(traced, m), want)


# --------------------------------------------------------------------------- SynFlow


class Block(nn.Module):
  norm: str = "layer"

  @nn.compact
  def __call__(self, x):
    norm = {
      "layer": lambda: nn.LayerNorm(),
      "rms": lambda: nn.RMSNorm(),
      "group": lambda: nn.GroupNorm(num_groups=2),
    }[self.norm]
    h = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(norm()(x))
    up = nn.Dense(16)(norm()(h))
    h = h + nn.Dense(8)(nn.gelu(up) * nn.Dense(16)(norm()(h)))
    return nn.Dense(3)(jnp.mean(norm()(h), axis=1))


@pytest.mark.parametrize("norm", ["layer", "rms", "group"])
def test_synflow_runs_on_normalization_attention_and_gating(norm):
  model = Block(norm)
  x = jnp.ones((1, 4, 8))
  v = model.init(jax.random.key(0), x)
  traced = sparsejax.trace(model, x, variables=v)
  s = scores.synflow_scores(traced, v)
  leaves = [np.asarray(a) for a in masks.mask_leaves(s)]
  assert all(np.isfinite(a).all() and (a >= 0).all() for a in leaves)
  assert all(a.max() > 0 for a in leaves)  # every layer lies on some path
  # a dead value projection: its head's query and key weights score 0
  m = traced.ones()
  value = m["MultiHeadDotProductAttention_0"]["value"]["kernel"]
  m["MultiHeadDotProductAttention_0"]["value"]["kernel"] = value.at[:, 0].set(False)
  s = scores.synflow_scores(traced, v, masks=m)
  q = np.asarray(s["MultiHeadDotProductAttention_0"]["query"]["kernel"])
  assert (q[:, 0] == 0).all() and (q[:, 1] > 0).all()
  prio = scores.synflow(traced, v, sparsity=0.9, rounds=5)
  assert sum(np.asarray(a).size for a in masks.mask_leaves(prio)) == traced_size(traced)


def traced_size(traced):
  return sum(int(np.prod(traced.shapes[i])) for i in traced.prunable)


def test_flops_of_lookups_and_tied_embeddings():
  """A lookup reads a row and multiplies nothing: the tied table's FLOPs are its output
  layer's (x @ table.T) alone; its parameters count once."""
  from sparsejax import flops

  model = EmbedLM(tied=True)
  v = model.init(jax.random.key(0), jnp.zeros((1, 5), INT))
  traced = sparsejax.trace(model, ids(1, 5), variables=v)
  c = flops.costs(traced, None)
  table = c["embed"]
  assert table.params_dense == 11 * 8
  assert table.flops_dense == 2 * 11 * 8 * 5  # the output layer at 5 positions
  assert table.flops_effective == table.flops_dense  # dense: every MAC is live
  untied = flops.costs(EmbedLM(), None, ids(1, 5))
  assert untied["embed"].flops_dense == 0 and untied["embed"].flops_effective == 0
