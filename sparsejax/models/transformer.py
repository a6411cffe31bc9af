"""Transformer blocks of the zoo's ViT and GPT: pre-norm residual blocks of multi-head
self-attention and a GELU MLP (plain Flax linen).

The heads are reshapes of the query, key and value projections: each is a Dense
[width, width] whose output columns ``h * d : (h + 1) * d`` are head h (d = width /
heads), and the output projection's rows of the same range read head h. So a head is a
block of columns of q/k/v and of rows of the output kernel, which is what the
connectivity transform and head pruning see.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Kernels of the attention and MLP projections: GPT-2's and BERT's normal(0.02).
kernel_init = nn.initializers.normal(0.02)


def check_heads(width: int, heads: int) -> int:
  """The head size ``width // heads``; ValueError unless ``heads`` divides ``width``."""
  if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
    raise ValueError(
      f"heads={heads!r} must be a positive integer that divides the width {width} "
      "(each head has width // heads features)."
    )
  return width // heads


class SelfAttention(nn.Module):
  """Multi-head self-attention, [B, T, W] -> [B, T, W].

  ``q, k, v = x Wq + bq, x Wk + bk, x Wv + bv`` (Dense 'query', 'key', 'value', kernels
  [W, W]), each reshaped to [B, T, H, D] with D = W / H;
  ``A_h = softmax(q_h k_h^T / sqrt(D))`` over the keys (with ``causal``, key j > query
  i is excluded); ``y = concat_h(A_h v_h) Wo + bo`` (Dense 'out').

  Attributes:
    heads: H (divides W).
    causal: a decoder's mask: position i attends to positions <= i.
    out_init: the output projection's kernel initializer (GPT-2 scales it by depth).
  """

  heads: int
  causal: bool = False
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    d = check_heads(w, self.heads)
    split = lambda y: y.reshape(b, t, self.heads, d)
    q = split(nn.Dense(w, kernel_init=kernel_init, name="query")(x))
    k = split(nn.Dense(w, kernel_init=kernel_init, name="key")(x))
    v = split(nn.Dense(w, kernel_init=kernel_init, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(d, x.dtype))
    if self.causal:
      allowed = jnp.tril(jnp.ones((t, t), bool))
      logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, w)
    return nn.Dense(w, kernel_init=self.out_init, name="out")(y)


class MLP(nn.Module):
  """[B, T, W] -> [B, T, W]: ``gelu(x W1 + b1) W2 + b2`` (Dense 'fc' [W, hidden], Dense
  'proj' [hidden, W])."""

  hidden: int
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(nn.Dense(self.hidden, kernel_init=kernel_init, name="fc")(x))
    return nn.Dense(x.shape[-1], kernel_init=self.out_init, name="proj")(h)


class Block(nn.Module):
  """Pre-norm residual block, [B, T, W] -> [B, T, W]:
  ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (LayerNorm 'norm_attention',
  'norm_mlp'; :class:`SelfAttention` 'attention', :class:`MLP` 'mlp' with hidden width
  ``mlp_ratio * W``)."""

  heads: int
  mlp_ratio: int = 4
  causal: bool = False
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    attention = SelfAttention(self.heads, self.causal, self.out_init, name="attention")
    x = x + attention(nn.LayerNorm(name="norm_attention")(x))
    mlp = MLP(self.mlp_ratio * x.shape[-1], self.out_init, name="mlp")
    return x + mlp(nn.LayerNorm(name="norm_mlp")(x))


def dead_parts(masks, heads: int) -> dict[str, tuple[int, int]]:
  """The heads, MLP neurons and embedding dimensions of the zoo's ViT or GPT that a mask
  tree disconnects (effective masks, or direct ones): {kind: (dead, total)}.

  Read from the masks of the blocks' kernels (a mask tree shaped like the params, with
  or without the 'params' level; a layer without a mask counts as dense):
  - 'heads': head h of a block (columns ``h d : (h + 1) d`` of 'value', rows of 'out')
    is dead when all its value columns or all its output rows are pruned: the head adds
    nothing to the residual stream (a dead query or key alone leaves uniform attention
    over the values, not a dead head);
  - 'mlp_neurons': hidden unit j is dead when column j of 'fc' or row j of 'proj' is
    pruned entirely;
  - 'embedding_dims': residual dimension i is dead when every weight of the input
    embedding ('embed': the token table [V, W] or the patch kernel [..., W]) into it is
    pruned: it carries no input, only the learned position embedding (a constant).
  """
  tree = masks.get("params", masks)
  dead = {"heads": [0, 0], "mlp_neurons": [0, 0], "embedding_dims": [0, 0]}

  def pruned(leaf, axis):  # bool [n]: every weight along the other axes pruned
    if leaf is None:
      return None
    m = jnp.asarray(leaf).astype(bool)
    m = jnp.moveaxis(m, axis, 0).reshape(m.shape[axis], -1)
    return ~m.any(axis=1)

  def count(kind, *columns):
    present = [c for c in columns if c is not None]
    total = max((len(c) for c in present), default=0)
    n = int(jnp.any(jnp.stack(present), axis=0).sum()) if present else 0
    dead[kind][0] += n
    dead[kind][1] += total

  embed = tree.get("embed", {})
  table = embed.get("embedding", embed.get("kernel"))
  if table is not None:
    count("embedding_dims", pruned(table, -1))
  for name in sorted(k for k in tree if k.startswith("block_")):
    block = tree[name]
    attention, mlp = block.get("attention", {}), block.get("mlp", {})
    value = pruned(attention.get("value", {}).get("kernel"), 1)
    out = pruned(attention.get("out", {}).get("kernel"), 0)
    parts = [p for p in (value, out) if p is not None]
    if parts:
      per_head = [p.reshape(heads, -1).all(axis=1) for p in parts]
      count("heads", *per_head)
    fc = pruned(mlp.get("fc", {}).get("kernel"), 1)
    proj = pruned(mlp.get("proj", {}).get("kernel"), 0)
    if fc is not None or proj is not None:
      count("mlp_neurons", fc, proj)
  return {k: (d, t) for k, (d, t) in dead.items()}
