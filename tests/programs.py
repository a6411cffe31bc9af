"""Small random programs for the structure and compaction tests, written as users write
them (plain ``jnp``: ``apply(params, x)``), with the couplings dependency groups must
follow: residual streams, concatenations, attention with several heads (fused or
separate projections), grouped-query attention, GLU MLPs, grouped and depthwise
convolutions, tied embeddings.

``sequence_blocks`` / ``conv_blocks``: hypothesis strategies of block lists;
``build(blocks, ...)`` returns (apply, params, example input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

ACTS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "none": lambda x: x}


def _ln(p, x):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mu)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


@st.composite
def sequence_blocks(draw, max_blocks: int = 3):
  """A list of blocks on a [1, T, D] stream."""
  blocks = []
  for _ in range(draw(st.integers(1, max_blocks))):
    kind = draw(st.sampled_from(("dense", "mlp", "attn", "concat", "ln")))
    if kind == "dense":
      blocks.append(("dense", draw(st.integers(2, 5)), draw(st.sampled_from(list(ACTS)))))
    elif kind == "mlp":
      blocks.append(("mlp", draw(st.integers(2, 5)), draw(st.booleans())))
    elif kind == "attn":
      kv = draw(st.integers(1, 2))
      groups = draw(st.integers(1, 2))
      blocks.append(("attn", kv * groups, kv, draw(st.integers(2, 3)), draw(st.booleans())))
    elif kind == "concat":
      blocks.append(("concat", draw(st.integers(2, 3)), draw(st.integers(2, 3))))
    else:
      blocks.append(("ln",))
  return blocks


@st.composite
def conv_blocks(draw, max_blocks: int = 3):
  """A list of blocks on a [1, H, W, C] image."""
  blocks = []
  for _ in range(draw(st.integers(1, max_blocks))):
    kind = draw(st.sampled_from(("conv", "grouped", "depthwise", "res")))
    if kind == "conv":
      blocks.append(("conv", draw(st.integers(2, 4))))
    elif kind == "grouped":
      blocks.append(("grouped", 2, draw(st.integers(1, 2)), draw(st.integers(1, 2))))
    elif kind == "depthwise":
      blocks.append(("depthwise", draw(st.integers(1, 2))))
    else:
      blocks.append(("res",))
  return blocks


class _Params:
  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.tree = {}

  def __call__(self, name, *shape, scale=None):
    scale = (1.0 / np.sqrt(shape[0])) if scale is None else scale
    self.tree[name] = jnp.asarray(self.rng.normal(size=shape) * scale, jnp.float32)
    return name


def build(blocks, *, seed=0, tokens=None, tied=False, width=4, length=3, classes=3):
  """(apply(params, x), params, example x [1, ...]) of a sequence model over ``blocks``
  (``tokens``: a vocabulary size, int inputs through an embedding; ``tied``: the output
  layer reads the embedding), or of a conv model when the blocks are conv blocks."""
  if blocks and blocks[0][0] in ("conv", "grouped", "depthwise", "res"):
    return _build_conv(blocks, seed=seed, width=width, classes=classes)
  P = _Params(seed)
  ops = []
  d = width
  if tokens:
    P("embed", tokens, d, scale=1.0)
  else:
    P("in_proj/kernel", 2, d)
  for i, b in enumerate(blocks):
    name = f"b{i}"
    if b[0] == "dense":
      _, w, act = b
      P(f"{name}/kernel", d, w)
      P(f"{name}/bias", w, scale=0.5)
      d = w
    elif b[0] == "mlp":
      _, h, glu = b
      P(f"{name}/ln/scale", d, scale=0.5)
      P(f"{name}/ln/bias", d, scale=0.5)
      P(f"{name}/up", d, h)
      if glu:
        P(f"{name}/gate", d, h)
      P(f"{name}/down", h, d)
      P(f"{name}/down_bias", d, scale=0.5)
    elif b[0] == "attn":
      _, heads, kv, dh, fused = b
      P(f"{name}/ln/scale", d, scale=0.5)
      P(f"{name}/ln/bias", d, scale=0.5)
      if fused:
        P(f"{name}/qkv", d, (heads + 2 * kv) * dh)
      else:
        P(f"{name}/q", d, heads * dh)
        P(f"{name}/k", d, kv * dh)
        P(f"{name}/v", d, kv * dh)
        P(f"{name}/q_bias", heads * dh, scale=0.5)
      P(f"{name}/o", heads * dh, d)
    elif b[0] == "concat":
      _, w1, w2 = b
      P(f"{name}/a", d, w1)
      P(f"{name}/b", d, w2)
      d = w1 + w2
    else:
      P(f"{name}/scale", d, scale=0.5)
      P(f"{name}/bias", d, scale=0.5)
    ops.append((name, b))
  if not (tokens and tied):
    P("head/kernel", d, classes)
  elif d != width:  # tied: back to the embedding width
    P("to_embed", d, width)
  params = dict(P.tree)

  def apply(params, x):
    p = params
    if tokens:
      h = jnp.take(p["embed"], x, axis=0)
    else:
      h = x @ p["in_proj/kernel"]
    for name, b in ops:
      if b[0] == "dense":
        h = ACTS[b[2]](h @ p[f"{name}/kernel"] + p[f"{name}/bias"])
      elif b[0] == "mlp":
        z = _ln({"scale": p[f"{name}/ln/scale"], "bias": p[f"{name}/ln/bias"]}, h)
        u = z @ p[f"{name}/up"]
        u = jax.nn.gelu(z @ p[f"{name}/gate"]) * u if b[2] else jnp.tanh(u)
        h = h + u @ p[f"{name}/down"] + p[f"{name}/down_bias"]
      elif b[0] == "attn":
        _, heads, kv, dh, fused = b
        z = _ln({"scale": p[f"{name}/ln/scale"], "bias": p[f"{name}/ln/bias"]}, h)
        if fused:
          q, k, v = jnp.split(z @ p[f"{name}/qkv"], [heads * dh, (heads + kv) * dh], axis=-1)
        else:
          q = z @ p[f"{name}/q"] + p[f"{name}/q_bias"]
          k, v = z @ p[f"{name}/k"], z @ p[f"{name}/v"]
        t = h.shape[1]
        q = q.reshape(1, t, heads, dh)
        k = jnp.repeat(k.reshape(1, t, kv, dh), heads // kv, axis=2)
        v = jnp.repeat(v.reshape(1, t, kv, dh), heads // kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(1, t, heads * dh)
        h = h + o @ p[f"{name}/o"]
      elif b[0] == "concat":
        h = jnp.concatenate([jnp.tanh(h @ p[f"{name}/a"]), jax.nn.gelu(h @ p[f"{name}/b"])], -1)
      else:
        h = _ln({"scale": p[f"{name}/scale"], "bias": p[f"{name}/bias"]}, h)
    if tokens and tied:
      if "to_embed" in p:
        h = h @ p["to_embed"]
      return h @ p["embed"].T
    return h @ p["head/kernel"]

  if tokens:
    x = jnp.asarray(np.arange(length) % tokens, jnp.int32)[None]
  else:
    x = jnp.ones((1, length, 2), jnp.float32)
  return apply, params, x


def _build_conv(blocks, *, seed, width, classes):
  P = _Params(seed)
  ops = []
  c = width
  P("stem", 3, 3, 2, c, scale=0.5)
  for i, b in enumerate(blocks):
    name = f"b{i}"
    if b[0] == "conv":
      P(f"{name}/kernel", 3, 3, c, b[1], scale=0.3)
      P(f"{name}/bias", b[1], scale=0.5)
      c = b[1]
    elif b[0] == "grouped":
      _, g, per_in, per_out = b
      P(f"{name}/pre", 1, 1, c, g * per_in, scale=0.5)
      P(f"{name}/kernel", 3, 3, per_in, g * per_out, scale=0.3)
      c = g * per_out
    elif b[0] == "depthwise":
      P(f"{name}/kernel", 3, 3, 1, c * b[1], scale=0.3)
      c = c * b[1]
    else:
      P(f"{name}/k1", 3, 3, c, c, scale=0.3)
      P(f"{name}/k2", 1, 1, c, c, scale=0.3)
      P(f"{name}/scale", c, scale=0.5)
    ops.append((name, b))
  P("head/kernel", c, classes)
  params = dict(P.tree)

  def conv(x, k, groups=1):
    return jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )

  def apply(params, x):
    p = params
    h = jnp.tanh(conv(x, p["stem"]))
    for name, b in ops:
      if b[0] == "conv":
        h = jnp.tanh(conv(h, p[f"{name}/kernel"]) + p[f"{name}/bias"])
      elif b[0] == "grouped":
        h = jnp.tanh(conv(h, p[f"{name}/pre"]))
        h = jnp.tanh(conv(h, p[f"{name}/kernel"], b[1]))
      elif b[0] == "depthwise":
        h = jnp.tanh(conv(h, p[f"{name}/kernel"], h.shape[-1]))
      else:
        h = h + conv(jnp.tanh(conv(h, p[f"{name}/k1"])), p[f"{name}/k2"]) * p[f"{name}/scale"]
    return jnp.mean(h, axis=(1, 2)) @ p["head/kernel"]

  return apply, params, jnp.ones((1, 4, 4, 2), jnp.float32)
