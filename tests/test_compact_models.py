"""Compaction and structured pruning of models written as users write them (not the zoo):
a Flax-examples-style ResNet with BatchNorm, a ViT with a class token, a GPT-style
decoder with tied embeddings, an MLP-Mixer and a grouped-query attention block. The
compacted model computes the masked model's function (verify=True: float tolerance),
is smaller where units died or were pruned, jits, differentiates, trains with
with_masks and serializes with jax.export. Bad input: groups no analysis can follow
are reported and kept whole; masks that do not match the model name the leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import compact, structured
from sparsejax import masks as masks_lib

KEY = jax.random.key(0)

# ---------------------------------------------------------------- Flax examples' ResNet


class ResNetBlock(nn.Module):
  """examples/imagenet/models.py's block."""

  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """examples/imagenet/models.py's ResNet (train=True by default, as there)."""

  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    x = conv(self.num_filters, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(
          self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=nn.relu
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


# ---------------------------------------------------------------- ViT (big_vision style)


class EncoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
    y = nn.gelu(y)
    y = nn.Dense(x.shape[-1], name="mlp_out")(y)
    return x + y


class ViT(nn.Module):
  patch: int = 4
  width: int = 16
  depth: int = 2
  mlp_dim: int = 32
  heads: int = 4
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch,) * 2, strides=(self.patch,) * 2, name="embedding")(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      x = EncoderBlock(self.mlp_dim, self.heads, name=f"block{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


# ---------------------------------------------------------------- GPT-style decoder


class GPT(nn.Module):
  """nanoGPT-style: fused qkv, causal attention, GELU MLP, tied embeddings."""

  vocab: int = 13
  width: int = 16
  depth: int = 2
  heads: int = 4
  length: int = 6

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(self.vocab, self.width, name="wte")
    wpe = self.param("wpe", nn.initializers.normal(0.02), (self.length, self.width))
    b, t = tokens.shape
    x = wte(tokens) + wpe[:t]
    causal = nn.make_causal_mask(tokens)[:, 0]
    dh = self.width // self.heads
    for i in range(self.depth):
      h = nn.LayerNorm(name=f"ln{i}_1")(x)
      q, k, v = jnp.split(nn.Dense(3 * self.width, name=f"attn{i}")(h), 3, axis=-1)
      q, k, v = (a.reshape(b, t, self.heads, dh) for a in (q, k, v))
      att = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dh)
      att = jax.nn.softmax(jnp.where(causal[:, None], att, -1e9), axis=-1)
      y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, self.width)
      x = x + nn.Dense(self.width, name=f"proj{i}")(y)
      h = nn.LayerNorm(name=f"ln{i}_2")(x)
      x = x + nn.Dense(self.width, name=f"fc{i}_out")(
        nn.gelu(nn.Dense(4 * self.width, name=f"fc{i}_in")(h))
      )
    return wte.attend(nn.LayerNorm(name="ln_f")(x))


# ---------------------------------------------------------------- MLP-Mixer


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(x)))


class Mixer(nn.Module):
  patch: int = 4
  hidden: int = 16
  blocks: int = 2
  tokens_mlp: int = 8
  channels_mlp: int = 24
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.hidden, (self.patch,) * 2, strides=(self.patch,) * 2, name="stem")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    for i in range(self.blocks):
      y = nn.LayerNorm()(x)
      y = jnp.swapaxes(MlpBlock(self.tokens_mlp, name=f"token{i}")(jnp.swapaxes(y, 1, 2)), 1, 2)
      x = x + y
      x = x + MlpBlock(self.channels_mlp, name=f"channel{i}")(nn.LayerNorm()(x))
    x = nn.LayerNorm(name="pre_head")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


# ---------------------------------------------------------------- GQA block


class GQABlock(nn.Module):
  """A grouped-query attention block (Llama style: RMS norm, no biases, 4 query heads
  sharing 2 key/value heads), then a SwiGLU MLP and a linear read-out."""

  width: int = 16
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 4
  hidden: int = 24
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    x = nn.Dense(self.width, use_bias=False, name="in_proj")(x)
    h = nn.RMSNorm(name="attn_norm")(x)
    dense = functools.partial(nn.DenseGeneral, use_bias=False)
    q = dense((self.heads, self.head_dim), name="q")(h)
    k = dense((self.kv_heads, self.head_dim), name="k")(h)
    v = dense((self.kv_heads, self.head_dim), name="v")(h)
    g = self.heads // self.kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(self.head_dim), -1)
    y = jnp.einsum("bhts,bshd->bthd", att, v)
    x = x + dense(self.width, axis=(-2, -1), name="o")(y)
    h = nn.RMSNorm(name="mlp_norm")(x)
    u = nn.silu(nn.Dense(self.hidden, use_bias=False, name="gate")(h))
    u = u * nn.Dense(self.hidden, use_bias=False, name="up")(h)
    x = x + nn.Dense(self.width, use_bias=False, name="down")(u)
    return nn.Dense(self.num_classes, use_bias=False, name="out")(nn.RMSNorm()(x).mean(1))


def _perturbed(variables, key):
  """Nonzero biases, norm shifts and statistics (as after training)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for i, (path, a) in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    name = str(path[-1])
    if "var" in name or "scale" in name:
      out.append(jax.random.uniform(k, a.shape, minval=0.5, maxval=2.0))
    elif "bias" in name or "mean" in name:
      out.append(0.3 * jax.random.normal(k, a.shape))
    else:
      out.append(a)
  return jax.tree.unflatten(treedef, out)


MODELS = {
  "resnet": (ResNet(), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32), {"train": False}),
  "vit": (ViT(), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32), None),
  "gpt": (GPT(), jax.ShapeDtypeStruct((1, 6), jnp.int32), None),
  "mixer": (Mixer(), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32), None),
  "gqa": (GQABlock(), jax.ShapeDtypeStruct((1, 5, 3), jnp.float32), None),
}


@functools.cache
def setup(name):
  model, x, kw = MODELS[name]
  v = model.init(KEY, jnp.zeros(x.shape, x.dtype), **(kw or {}))
  v = _perturbed(v, jax.random.key(7))
  traced = sparsejax.trace(model, x, variables=v, apply_kwargs=kw)
  return model, v, traced


def random_masks(traced, seed, level):
  rng = np.random.default_rng(seed)
  return masks_lib.map_masks(lambda m: jnp.asarray(rng.random(m.shape) >= level), traced.ones())


# ---------------------------------------------------------------- tests


# CI time: 0.9 (fewer dead units) behind the exhaustive marker; 0.97 compacts every model
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("level", [pytest.param(0.9, marks=pytest.mark.exhaustive), 0.97])
def test_random_masks_compact_to_the_masked_function(name, level):
  model, v, traced = setup(name)
  m = random_masks(traced, 0, level)
  c = compact.compact(traced, v, m, verify=True)
  assert compact.check_equal(traced, v, m, c, c.variables) <= compact.RTOL
  if level == 0.97:  # many units die: the compacted model is smaller
    assert c.plan.live_fraction() < 1.0
    n = lambda t: sum(int(np.size(a)) for a in jax.tree.leaves(t))
    assert n(c.params) < n(v["params"])


STRUCTURED = {
  "resnet": ["channel/l1"],
  "vit": ["head/l1", "neuron/magnitude/global"],
  "gpt": ["head/random", "neuron/l1"],
  "mixer": ["neuron/l1/igq"],
  "gqa": ["head/l1/global", "neuron/random"],
}


def pruned_units(traced, group, masks) -> set:
  """Units of ``group`` whose every column (the slices it writes) is masked."""
  flat = dict(zip(traced.paths, traced.params_spec[0].flatten_up_to(masks)))
  alive = np.zeros(group.size, bool)
  for sl in group.slices_of("writes"):
    m = np.asarray(flat[sl.path])
    per = m.any(axis=tuple(a for a in range(m.ndim) if a != sl.axis))
    inside = sl.units >= 0
    np.logical_or.at(alive, sl.units[inside], per[inside])
  return set(np.flatnonzero(~alive).tolist())


# CI time: each model's first pruner by default, the others behind the exhaustive marker
@pytest.mark.parametrize(
  "name,pruner",
  [
    pytest.param(n, p, marks=[pytest.mark.exhaustive] if i else [])
    for n, ps in STRUCTURED.items()
    for i, p in enumerate(ps)
  ],
)
def test_structured_pruning_then_compaction(name, pruner):
  model, v, traced = setup(name)
  kind = pruner.split("/")[0]
  m = structured.prune(pruner, key=KEY, model=traced, variables=v, fraction=0.5)
  c = compact.compact(traced, v, m, verify=True)
  removed = 0
  for g in structured.spaces_of(traced, v, kind):
    gone = pruned_units(traced, g, m)
    removed += len(gone)
    # every pruned unit is gone (dropped, or its constant folded into the next bias),
    # except a residual stream's: its biases are nonzero after training, and the layer
    # norms' statistics read that constant (exactness beats size)
    if not g.name.startswith("stream"):
      assert gone <= set(c.plan.dropped[g.name]) | set(c.plan.folded[g.name]), g.name
  sizes = [g.size for g in structured.spaces_of(traced, v, kind)]
  assert removed >= (round(0.5 * sum(sizes)) if "global" in pruner else 0) and removed > 0
  # the compacted model is an ordinary model: traceable, compactable, nothing is left
  again = compact.compact(c, c.params, c.masks, traced.input)
  assert all(len(k) == again.plan.sizes[s] for s, k in again.plan.kept.items())


def test_a_pruned_stream_is_removed_where_it_is_exactly_zero():
  """At initialization (biases and norm shifts zero) a pruned stream unit is zero where
  the layer norms' statistics read it, and its normalized value is read by masked rows
  only: the stream narrows. A learned positional embedding (not a linear op's weight,
  so not masked) that is nonzero in the pruned columns keeps them: the norms'
  statistics read that constant (exactness beats size)."""
  model, _, _ = setup("gpt")
  x = MODELS["gpt"][1]
  v = model.init(KEY, jnp.zeros(x.shape, x.dtype))
  traced = sparsejax.trace(model, x, variables=v)
  m = structured.prune(
    "neuron/l1",
    key=KEY,
    model=traced,
    variables=v,
    fraction=0.5,
    only=lambda g: g.name == "stream1",
  )
  kept_whole = compact.compact(traced, v, m, verify=True)
  assert len(kept_whole.plan.kept["stream1"]) == 16
  zero_wpe = {**v, "params": {**v["params"], "wpe": jnp.zeros_like(v["params"]["wpe"])}}
  c = compact.compact(traced, zero_wpe, m, verify=True)
  assert len(c.plan.kept["stream1"]) == 8
  assert c.params["wte"]["embedding"].shape == (13, 8) and c.params["wpe"].shape == (6, 8)


def test_vit_with_half_its_heads_and_mlp_neurons_removed():
  model, v, traced = setup("vit")
  heads = structured.prune("head/l1", key=KEY, model=traced, variables=v, fraction=0.5)
  mlp = structured.prune(
    "neuron/l1",
    key=KEY,
    model=traced,
    variables=v,
    fraction=0.5,
    only=lambda g: g.name.endswith("mlp_in"),
  )
  m = jax.tree.map(lambda a, b: a & b, heads, mlp)
  c = compact.compact(traced, v, m, verify=True)
  for i in range(2):
    blk = c.params[f"block{i}"]
    assert blk["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (16, 2, 4)
    assert blk["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (2, 4, 16)
    assert blk["mlp_in"]["kernel"].shape == (16, 16)
  assert c.params["head"]["kernel"].shape == (16, 5)  # the stream is kept whole


def test_gqa_kv_heads_and_their_query_heads_go_together():
  model, v, traced = setup("gqa")
  s = sparsejax.structure(traced)
  heads = s.removable("head")
  kv = next(g for g in heads if any(sl.path == "k/kernel" for sl in g.slices))
  m = s.unit_masks({kv.name: [1]})
  c = compact.compact(traced, v, m, verify=True)
  assert c.params["k"]["kernel"].shape == (16, 1, 4) and c.params["v"]["kernel"].shape == (16, 1, 4)
  assert c.params["q"]["kernel"].shape == (16, 2, 4)  # the 2 query heads of kv head 1
  assert c.params["o"]["kernel"].shape == (2, 4, 16)


def test_gpt_tied_embedding_stream_and_fused_qkv():
  model, v, traced = setup("gpt")
  s = sparsejax.structure(traced)
  stream = s["stream1"]
  assert stream.size == 16 and stream.removable
  assert {sl.path for sl in stream.slices if sl.role == "writes"} >= {"wte/embedding"}
  (h0,) = [g for g in s.removable("head") if g.writers[0] == "attn0"]
  qkv = next(sl for sl in h0.slices if sl.path == "attn0/kernel")
  np.testing.assert_array_equal(qkv.units, np.tile(np.repeat(np.arange(4), 4), 3))
  m = s.unit_masks({h0.name: [0, 3]})
  c = compact.compact(traced, v, m, verify=True)
  assert c.params["attn0"]["kernel"].shape == (16, 24)
  assert c.params["proj0"]["kernel"].shape == (8, 16)


def test_the_compacted_program_jits_differentiates_trains_and_exports():
  model, v, traced = setup("vit")
  m = structured.prune("head/l1", key=KEY, model=traced, variables=v, fraction=0.5)
  c = compact.compact(traced, v, m, verify=True)
  x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
  y = jnp.arange(4) % 5

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(c.apply(p, x), y).mean()

  g = jax.jit(jax.grad(loss))(c.params, x, y)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
  tx = sparsejax.with_masks(optax.sgd(0.1), c.masks)
  params = c.params
  state = tx.init(params)
  before = float(loss(params, x, y))
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params, x, y)) < before
  for a, mk in zip(masks_lib.mask_leaves(c.masks), masks_lib.mask_leaves(c.masks)):
    assert a.shape == mk.shape
  exported = jax.export.export(jax.jit(c.apply))(c.params, x, c.extra)
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_allclose(restored.call(c.params, x, c.extra), c.apply(c.params, x), rtol=1e-6)


def test_widths_rounded_up_to_a_multiple_are_the_same_function():
  model, v, traced = setup("mixer")
  m = random_masks(traced, 1, 0.97)
  plain = compact.compact(traced, v, m)
  rounded = compact.compact(traced, v, m, multiple=8, verify=True)
  for name, kept in rounded.plan.kept.items():
    size, folded = rounded.plan.sizes[name], len(rounded.plan.folded[name])
    assert len(kept) % 8 == 0 or len(kept) == size - folded
    assert len(kept) >= len(plain.plan.kept[name])


# ---------------------------------------------------------------- bad input


class Cumulative(nn.Module):
  """A hidden layer whose units a cumulative sum mixes: no group can follow it."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6, name="hidden")(x))
    h = nn.Dense(6, name="mixed")(h)
    return nn.Dense(3, name="out")(jnp.cumsum(h, axis=-1))


def test_groups_no_analysis_can_follow_are_reported_and_kept():
  model = Cumulative()
  v = model.init(KEY, jnp.ones((1, 4)))
  traced = sparsejax.trace(model, (4,), variables=v)
  s = sparsejax.structure(traced)
  assert not s["mixed"].removable and "cumulative" in s["mixed"].reason
  assert "mixed" in s.table() and "cumulative" in s.table()
  m = traced.ones()
  m["mixed"]["kernel"] = m["mixed"]["kernel"].at[:, :3].set(False)  # dead units: kept
  m["hidden"]["kernel"] = m["hidden"]["kernel"].at[:, :2].set(False)  # dead: removed
  c = compact.compact(traced, v, m, verify=True)
  assert c.params["mixed"]["kernel"].shape == (4, 6) and "mixed" in c.plan.blocked
  assert c.params["hidden"]["kernel"].shape == (4, 4)
  with pytest.raises(ValueError, match="'mixed', which is not removable: summed cumulatively"):
    structured.masks_for(traced, v, {"mixed": [0]})


def test_masks_that_do_not_match_name_the_leaf():
  model, v, traced = setup("gpt")
  m = traced.ones()
  m["attn0"]["kernel"] = m["attn0"]["kernel"][:, :10]
  with pytest.raises(ValueError, match=r"masks\['attn0/kernel'\] has shape \(16, 10\)"):
    compact.compact(traced, v, m)
  m = traced.ones()
  m["ln_f"] = {"scale": jnp.ones(16, bool)}
  with pytest.raises(ValueError, match="ln_f"):
    compact.compact(traced, v, m)


def test_a_class_token_tiled_over_the_batch_leaves_the_stream_removable():
  """jnp.tile repeats the class token over the batch axis only: the width axis passes
  through (it blocked the stream's group before). Stream units whose writers are
  masked and whose constants (class token, positions, biases) are zero are removed."""
  model, _, _ = setup("vit")
  x = MODELS["vit"][1]
  v = model.init(KEY, jnp.zeros(x.shape, x.dtype))
  params = {**v["params"]}
  params["cls"] = jnp.zeros_like(params["cls"])
  params["pos_embedding"] = jnp.zeros_like(params["pos_embedding"])
  v = {**v, "params": params}
  traced = sparsejax.trace(model, x, variables=v)
  s = sparsejax.structure(traced)
  (stream,) = [g for g in s.groups if g.name.startswith("stream")]
  assert stream.removable and stream.size == 16
  keep = list(range(4, 16))  # unit_masks names the units kept
  c = compact.compact(traced, v, s.unit_masks({stream.name: keep}), verify=True)
  assert len(c.plan.kept[stream.name]) == 12
  assert c.params["cls"].shape == (1, 1, 12) and c.params["head"]["kernel"].shape == (12, 5)
